"""Every Sentinel-2 and KappaMask constant of the project: levels, bands, classes, colours.

Nothing else in the package spells a band name or a class code.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

LEVELS = ("L1C", "L2A")

#: The 13 spectral bands in ESA ``band_id`` order (0..12), as used by the
#: RADIO_ADD_OFFSET / BOA_ADD_OFFSET lists of the product metadata.
SPECTRAL_BANDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)

#: L2A auxiliary layers that are not reflectances (no offset ever applies).
AUX_BANDS = ("AOT", "WVP")

#: Native ground sampling distance of each layer, in metres.
NATIVE_RESOLUTION = {
    "B01": 60,
    "B02": 10,
    "B03": 10,
    "B04": 10,
    "B05": 20,
    "B06": 20,
    "B07": 20,
    "B08": 10,
    "B8A": 20,
    "B09": 60,
    "B10": 60,
    "B11": 20,
    "B12": 20,
    "AOT": 20,
    "WVP": 20,
    "SCL": 20,
}

#: Output resolutions a user may ask for.
RESOLUTIONS = (10, 20, 60)
DEFAULT_RESOLUTION = 10

#: Digital number of "no data" in every Sentinel-2 band file.
NODATA_DN = 0
#: Digital numbers are scaled by this before the per-band max normalisation (ARCHITECTURE.md §3).
DN_SCALE = 65535.0

# Feature lists and normalisation of the published KappaMask U-Nets. They are the
# defaults written into a model's config.pbtxt; the client always uses what the
# served model declares, so a retrained model with other features needs no code change.
L1C_FEATURES = SPECTRAL_BANDS
L1C_MAX_V = (
    0.21,
    0.326,
    0.264,
    0.298,
    0.245,
    0.258,
    0.266,
    0.364,
    0.259,
    0.165,
    0.055,
    0.203,
    0.208,
)
L2A_FEATURES = (
    "AOT",
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B08",
    "B8A",
    "B09",
    "B11",
    "B12",
    "WVP",
)
L2A_MAX_V = (
    0.003906309604644775,
    0.2833447754383087,
    0.27905699610710144,
    0.2668497860431671,
    0.2558480203151703,
    0.250980406999588,
    0.24597543478012085,
    0.24182498455047607,
    0.24206912517547607,
    0.2535133957862854,
    0.2232242375612259,
    0.23524834215641022,
    0.07557793706655502,
)
DEFAULT_FEATURES = {"L1C": L1C_FEATURES, "L2A": L2A_FEATURES}
DEFAULT_MAX_V = {"L1C": L1C_MAX_V, "L2A": L2A_MAX_V}

# The inputs of km_predict's DeepLabv3+ models (its data_generator.py and km_predict.py):
# L1C the same 13 bands; L2A 14 features, B07 included; each with its own max_v.
DEEPLAB_L1C_MAX_V = (
    0.2065003365278244,
    0.3510643243789673,
    0.3327534794807434,
    0.3624475598335266,
    0.29547569155693054,
    0.29562827944755554,
    0.29103532433509827,
    0.3791866898536682,
    0.2850232720375061,
    0.18451209366321564,
    0.0799115002155304,
    0.24786755442619324,
    0.24827954173088074,
)
DEEPLAB_L2A_FEATURES = (
    "AOT",
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B11",
    "B12",
    "WVP",
)
DEEPLAB_L2A_MAX_V = (
    0.010711833834648132,
    0.32552072405815125,
    0.3022507131099701,
    0.28221559524536133,
    0.2690470814704895,
    0.27560845017433167,
    0.2571450471878052,
    0.2557412087917328,
    0.2529335618019104,
    0.2544899582862854,
    0.2657511234283447,
    0.2381628155708313,
    0.2401922643184662,
    0.14035248756408691,
)
#: Features and max_v of a model by architecture and level (what an imported file gets
#: unless told otherwise).
ARCHITECTURE_FEATURES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "unet": DEFAULT_FEATURES,
    "deeplabv3plus": {"L1C": L1C_FEATURES, "L2A": DEEPLAB_L2A_FEATURES},
}
ARCHITECTURE_MAX_V: Mapping[str, Mapping[str, tuple[float, ...]]] = {
    "unet": DEFAULT_MAX_V,
    "deeplabv3plus": {"L1C": DEEPLAB_L1C_MAX_V, "L2A": DEEPLAB_L2A_MAX_V},
}

#: Triton model name per processing level.
MODEL_NAMES = {"L1C": "kappamask_l1c", "L2A": "kappamask_l2a"}


class MaskClass(IntEnum):
    """Output codes of the mask (the paper's; km_predict v2 used 5 for missing)."""

    MISSING = 0
    CLEAR = 1
    CLOUD_SHADOW = 2
    SEMI_TRANSPARENT_CLOUD = 3
    CLOUD = 4
    #: Only in labels: excluded from the loss and from metrics, never predicted.
    UNDEFINED = 5


#: Classes a model can output, in mask code order.
OUTPUT_CLASSES = (
    MaskClass.MISSING,
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
)

#: Order of the 6 output channels of the published networks (and of ours).
NETWORK_OUTPUT_ORDER = (
    MaskClass.UNDEFINED,
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
    MaskClass.MISSING,
)
NUM_NETWORK_OUTPUTS = len(NETWORK_OUTPUT_ORDER)

CLASS_NAMES = {
    MaskClass.MISSING: "missing",
    MaskClass.CLEAR: "clear",
    MaskClass.CLOUD_SHADOW: "cloud_shadow",
    MaskClass.SEMI_TRANSPARENT_CLOUD: "semi_transparent_cloud",
    MaskClass.CLOUD: "cloud",
}
CLASS_DESCRIPTIONS = {
    MaskClass.MISSING: "No data: outside the swath, or a band without a valid value",
    MaskClass.CLEAR: "Clear land, water or snow",
    MaskClass.CLOUD_SHADOW: "Shadow cast by a cloud",
    MaskClass.SEMI_TRANSPARENT_CLOUD: "Thin, semi-transparent cloud (cirrus, haze)",
    MaskClass.CLOUD: "Opaque cloud",
}
#: RGBA colours of the COG colour table and the PNG preview.
CLASS_COLORS: dict[int, tuple[int, int, int, int]] = {
    MaskClass.MISSING: (0, 0, 0, 0),
    MaskClass.CLEAR: (46, 160, 67, 255),
    MaskClass.CLOUD_SHADOW: (90, 60, 140, 255),
    MaskClass.SEMI_TRANSPARENT_CLOUD: (120, 200, 240, 255),
    MaskClass.CLOUD: (245, 245, 245, 255),
}

#: The usable-pixel mask (``valid`` asset): clear after buffers, anything else, no data.
VALID_CLEAR, VALID_UNUSABLE, VALID_NODATA = 1, 0, 255
#: Largest cloud or shadow buffer a run accepts, in metres (100 px at 10 m).
MAX_BUFFER_M = 1000.0

#: Sen2Cor scene classification (SCL) -> mask code, after the paper's Table 1.
SCL_TO_CLASS = {
    0: MaskClass.MISSING,  # no data
    1: MaskClass.MISSING,  # saturated or defective
    2: MaskClass.CLEAR,  # dark area pixels
    3: MaskClass.CLOUD_SHADOW,
    4: MaskClass.CLEAR,  # vegetation
    5: MaskClass.CLEAR,  # not vegetated
    6: MaskClass.CLEAR,  # water
    7: MaskClass.UNDEFINED,  # unclassified
    8: MaskClass.CLOUD,  # cloud medium probability
    9: MaskClass.CLOUD,  # cloud high probability
    10: MaskClass.SEMI_TRANSPARENT_CLOUD,  # thin cirrus
    11: MaskClass.CLEAR,  # snow or ice
}

# Tiling of the network input: the paper's 512 px crops. The paper (and km_predict,
# overlap 0.0625) share 32 px and cut the mosaic halfway; this service blends the scores
# over the overlap (kappamask.geometry.tiling), and shares 64 px so that every pixel of a blend
# lies at least 32 px inside one of its crops: on real SEN12MS-CR crops the class there
# agrees with a crop's interior for 99.65 % (L1C) / 99.74 % (L2A) of pixels, at 16 px (the
# middle of a 32 px overlap) for 99.19 % / 99.57 %, at the edge for 96.2 % / 91.4 %
# (`python benchmarks/crop_edges.py`, the v2/v3 bootstrap models).
TILE_SIZE = 512
TILE_OVERLAP = 64

#: Stand-ins for a model feature a product lacks. Sen2Cor's R60m folder has no B08, so
#: a 60 m-only L2A product can still be masked with the narrow NIR band B8A (865 nm,
#: 20 nm from B08's 842 nm centre). Every substitution is logged and written into the
#: STAC item, never silent.
BAND_SUBSTITUTES = {"B08": "B8A"}

#: STAC asset keys and eo:bands common names of Sentinel-2 layers (Earth Search v1 keys,
#: the common names of the eo extension), to find bands in STAC items that do not key
#: assets by band name.
STAC_BAND_ALIASES = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "cirrus": "B10",
    "swir16": "B11",
    "swir22": "B12",
    "aot": "AOT",
    "wvp": "WVP",
    "scl": "SCL",
}
#: ESA's radiometric offset (DN) on every spectral band from processing baseline 04.00 on,
#: for sources that do not state it (STAC items without raster:bands offsets).
BASELINE_04_OFFSET_DN = -1000.0
