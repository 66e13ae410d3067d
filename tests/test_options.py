"""One options contract: the CLI and the process build the same RunOptions and get the
same messages; the process description shows the contract's defaults and choices."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
from click.testing import CliRunner

from kappamask.api.process import PROCESS_METADATA, KappaMaskBatchProcessor, parse_inputs
from kappamask.cli import main
from kappamask.errors import InvalidInputError
from kappamask.options import RESAMPLING_METHODS, RunOptions, declarations
from kappamask.reading.reader import RESAMPLING

from .conftest import DATA, T29UNU

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}


def test_the_process_describes_the_contracts_defaults() -> None:
    defaults = RunOptions()
    inputs = PROCESS_METADATA["inputs"]
    for name in ("resolution", "resampling", "overwrite", "cloud_buffer", "shadow_buffer"):
        assert inputs[name]["schema"]["default"] == getattr(defaults, name), name
    assert inputs["resampling"]["schema"]["enum"] == list(RESAMPLING_METHODS)
    assert set(RESAMPLING) == set(RESAMPLING_METHODS)  # what the reader maps is what is allowed


def test_the_input_schema_and_the_flags_come_from_one_declaration() -> None:
    """Every declared option is an input of both processes and a flag of `run` and
    `batch`, with the declaration's texts: adding an option touches RunOptions only."""
    names = [name for name, _declared in declarations()]
    assert names == [f.name for f in fields(RunOptions) if f.init]
    batch = KappaMaskBatchProcessor.METADATA["inputs"]
    for name, declared in declarations():
        for inputs in (PROCESS_METADATA["inputs"], batch):
            assert inputs[name]["title"] == declared.title
            assert inputs[name]["description"] == declared.description
    for command in ("run", "batch"):
        shown = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        for name, declared in declarations():
            assert "--" + name.replace("_", "-") in shown, (command, name)
            assert " ".join(declared.help.split()) in shown, (command, name)


def test_inputs_map_onto_options() -> None:
    _product, output, options = parse_inputs(
        {
            "product": "x.SAFE",
            "resolution": 20,
            "level": "auto",
            "output": " out ",
            "bbox": {"bbox": [1, 2, 3, 4], "crs": "http://www.opengis.net/def/crs/OGC/1.3/CRS84"},
            "cloud_buffer": 100,
            "overwrite": True,
        }
    )
    assert output == "out"
    assert options == RunOptions(20, bbox=(1.0, 2.0, 3.0, 4.0), cloud_buffer=100.0, overwrite=True)
    assert options.level is None and options.area is not None
    assert options.area.bounds == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"resolution": 30}, "input 'resolution' must be one of [10, 20, 60]"),
        ({"resolution": True}, "input 'resolution' must be one of [10, 20, 60]"),
        ({"resampling": "cubic"}, "input 'resampling' must be one of ['bilinear', 'lanczos']"),
        ({"level": "L3"}, "input 'level' must be one of ['auto', 'L1C', 'L2A']"),
        ({"bbox": [1, 2, 3]}, "input 'bbox' must be [west, south, east, north] in degrees"),
        ({"bbox": [3, 2, 1, 4]}, "west < east"),
        ({"bbox": {"bbox": [1, 2, 3, 4], "crs": "EPSG:3857"}}, "must be in CRS84"),
        ({"bbox": [0, 0, 1, 1], "aoi": SQUARE}, "either 'bbox' or 'aoi', not both"),
        ({"aoi": {"type": "Point", "coordinates": [0, 0]}}, "GeoJSON Polygon or MultiPolygon"),
        ({"aoi": [1, 2]}, "input 'aoi' must be a GeoJSON object"),
        ({"model": "a b"}, "input 'model' must be a model name"),
        ({"overwrite": "yes"}, "input 'overwrite' must be true or false"),
        ({"shadow_buffer": -1}, "input 'shadow_buffer' must be a number of metres from 0"),
    ],
)
def test_each_option_is_checked_once_with_a_message_naming_it(
    inputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_inputs({"product": "x.SAFE", **inputs})
    assert message in str(caught.value)


def test_a_feature_collection_is_the_union_of_its_polygons() -> None:
    other = {"type": "Polygon", "coordinates": [[[2, 0], [3, 0], [3, 1], [2, 1], [2, 0]]]}
    collection = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": SQUARE, "properties": {}},
            {"type": "Feature", "geometry": other, "properties": {"name": "field 2"}},
        ],
    }
    options = RunOptions(aoi=collection)
    assert options.area is not None and options.area.area == pytest.approx(2.0)
    assert options.area.bounds == (0.0, 0.0, 3.0, 1.0)
    with pytest.raises(InvalidInputError, match="FeatureCollection without features"):
        RunOptions(aoi={"type": "FeatureCollection", "features": []})


def test_the_cli_gives_the_process_message(tmp_path: Any) -> None:
    """A bad AOI file: the CLI stops with the message the process answers (exit 2, the
    class's code for bad input), before starting Triton."""
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text('{"type": "Point", "coordinates": [0, 0]}')
    done = CliRunner().invoke(
        main, ["run", str(T29UNU), "--out", str(tmp_path / "o"), "--aoi", str(aoi)]
    )
    assert done.exit_code == 2, done.output
    assert "input 'aoi' must be a GeoJSON Polygon or MultiPolygon" in done.output
    assert not (tmp_path / "o").exists()


def test_a_tool_without_its_extra_says_which_to_install(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h5py is in the tools extra, not the service's dependencies: import-keras without
    it names the extra instead of printing a traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` fails as if absent
    for name in [m for m in sys.modules if m.startswith("kappamask.tools.")]:
        monkeypatch.delitem(sys.modules, name)
    weights = tmp_path / "l2a_unet.hdf5"
    weights.write_bytes(b"")
    done = CliRunner().invoke(
        main, ["import-keras", str(weights), "--level", "L2A", "--out", str(tmp_path / "m.onnx")]
    )
    assert done.exit_code == 1, done.output
    assert "needs h5py: pip install 'kappamask[tools]'" in done.output


def test_check_precision_without_openvino_says_which_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if absent
    patch = DATA / "sen12mscr"
    done = CliRunner().invoke(main, ["check-precision", "L1C", "--data", str(patch)])
    assert done.exit_code == 1, done.output
    assert "needs openvino: pip install 'kappamask[triton]'" in done.output
