"""Label Studio as the labelling tool: a review's sub-tiles go in as tasks with the
model's mask as a brush pre-annotation (a person corrects it rather than paints from
nothing, as the paper's labellers did in Segments.ai), and finished annotations come back
as label rasters (``subtiles.ReviewFolder.write_labels``).

Only Label Studio's documented HTTP API is used (requests, no SDK: the SDK needs numpy 2,
which the bundled Triton cannot load). Tokens: a personal access token (a JWT, exchanged
at ``/api/token/refresh/`` for a short-lived access token) or a legacy API token.
``labelstudio.json`` in the review folder records the server, the project and which task
holds which sub-tile; never the token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import requests

from kappamask.bands import CLASS_DESCRIPTIONS, CLASS_NAMES, OUTPUT_CLASSES, MaskClass
from kappamask.errors import InvalidInputError, LabellingToolError
from kappamask.tools.labelling import rle
from kappamask.tools.labelling.subtiles import LABEL_COLOURS, ReviewedTile, ReviewFolder

LOGGER = logging.getLogger(__name__)

RECORD_FILE = "labelstudio.json"
#: Names in the labelling configuration (``from_name`` / ``to_name`` of every result).
BRUSH, IMAGE = "mask", "image"
#: The task data key that names the sub-tile.
SUB_TILE_KEY = "sub_tile"
CODE_OF_LABEL = {CLASS_NAMES[c]: int(c) for c in OUTPUT_CLASSES}
TIMEOUT_S = 60.0
ProgressFn = Callable[[int, str], None]


def label_config() -> str:
    """The project's labelling interface: the true-colour sub-tile, zoomable, with one
    brush label per KappaMask class in the service's colours (keys 1-5)."""
    labels = "".join(
        f"<Label value={quoteattr(CLASS_NAMES[c])} background="
        f"{quoteattr('#{:02x}{:02x}{:02x}'.format(*LABEL_COLOURS[c]))} "
        f"hotkey={quoteattr(str(key))}/>"
        for key, c in enumerate(OUTPUT_CLASSES[1:] + OUTPUT_CLASSES[:1], 1)
    )
    return (
        '<View><Header value="$title"/>'
        f'<Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true" '
        'brightnessControl="true" contrastControl="true"/>'
        f'<BrushLabels name="{BRUSH}" toName="{IMAGE}">{labels}</BrushLabels></View>'
    )


def instructions() -> str:
    """What a labeller is asked to do (the project's description and instructions)."""
    classes = "; ".join(f"{CLASS_NAMES[c]}: {CLASS_DESCRIPTIONS[c]}" for c in OUTPUT_CLASSES)
    return (
        "Each task is a 512 px Sentinel-2 sub-tile in true colour, with the KappaMask "
        "model's mask as a pre-annotation. Correct the mask where it is wrong: paint over "
        "it with the right class (a later stroke wins), erase what cannot be told. "
        f"Unpainted pixels are left out of training. Classes: {classes}."
    )


class LabelStudio:
    """A Label Studio server, over its HTTP API."""

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"Label Studio URL {url!r} is not an http(s) URL")
        if not token:
            raise InvalidInputError(
                "no Label Studio token: give --token or set LABEL_STUDIO_API_KEY (Account & "
                "Settings > Personal Access Token in Label Studio)"
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if token.count(".") == 2:  # a personal access token: a JWT refresh token
            access = self._call("POST", "/api/token/refresh/", json={"refresh": token})
            self.session.headers["Authorization"] = f"Bearer {access['access']}"
        else:
            self.session.headers["Authorization"] = f"Token {token}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        where = f"Label Studio at {self.url}"
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as err:
            raise LabellingToolError(f"cannot reach {where}: {err}") from err
        if response.status_code in (401, 403):
            raise LabellingToolError(
                f"{where} refused the token ({response.status_code}: {_detail(response)})"
            )
        if response.status_code >= 400:
            raise LabellingToolError(
                f"{where} answered {method} {path} with {response.status_code}: {_detail(response)}"
            )
        try:
            return response.json()
        except ValueError as err:
            raise LabellingToolError(f"{where} answered {path} with no JSON") from err

    def create_project(self, title: str, config: str, description: str) -> int:
        body = {
            "title": title,
            "label_config": config,
            "description": description,
            "expert_instruction": description,
            "show_instruction": True,
        }
        return int(self._call("POST", "/api/projects", json=body)["id"])

    def upload(self, project: int, image: Path) -> str:
        """Store ``image`` in Label Studio (no task yet); the URL tasks refer to it by."""
        with image.open("rb") as fh:
            answer = self._call(
                "POST",
                f"/api/projects/{project}/import",
                params={"commit_to_project": "false"},
                files={"file": (image.name, fh, "image/png")},
            )
        upload_id = answer["file_upload_ids"][0]
        stored = self._call("GET", f"/api/import/file-upload/{upload_id}")["file"]
        return f"/data/{stored}"

    def import_tasks(self, project: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        answer = self._call(
            "POST",
            f"/api/projects/{project}/import",
            params={"return_task_ids": "true"},
            json=list(tasks),
        )
        return [int(i) for i in answer.get("task_ids", [])]

    def finished_tasks(self, project: int) -> list[dict[str, Any]]:
        """The project's tasks that have annotations, with them."""
        tasks = self._call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"})
        return list(tasks)


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("validation_errors") or body)[:300]
    return str(body)[:300]


def brush_results(mask: np.ndarray, origin: str = "prediction") -> list[dict[str, Any]]:
    """A mask in mask codes as brush results, one per class present (UNDEFINED: none)."""
    height, width = mask.shape
    return [
        {
            "from_name": BRUSH,
            "to_name": IMAGE,
            "type": "brushlabels",
            "origin": origin,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": rle.encode(mask == code),
                "brushlabels": [CLASS_NAMES[MaskClass(code)]],
            },
        }
        for code in CODE_OF_LABEL.values()
        if (mask == code).any()
    ]


def rasterise(results: Sequence[Mapping[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """An annotation's brush results as mask codes (UNDEFINED where none paints); later
    results paint over earlier ones, as the editor's layers do."""
    labels = np.full(shape, int(MaskClass.UNDEFINED), np.uint8)
    height, width = shape
    for result in results:
        if result.get("type") != "brushlabels" or result.get("from_name") != BRUSH:
            raise InvalidInputError(
                f"a {result.get('type')!r} result from {result.get('from_name')!r}: only the "
                f"{BRUSH!r} brush of the KappaMask project is understood"
            )
        size = (result.get("original_width"), result.get("original_height"))
        if size != (width, height) or result.get("image_rotation", 0):
            raise InvalidInputError(
                f"a brush result drawn on {size[0]} x {size[1]} px "
                f"(rotated {result.get('image_rotation', 0)}) for a {width} x {height} sub-tile"
            )
        value = result["value"]
        for name in value.get("brushlabels", []):
            if name not in CODE_OF_LABEL:
                raise InvalidInputError(f"label {name!r} is not a KappaMask class")
            labels[rle.decode(value["rle"], width, height)] = CODE_OF_LABEL[name]
    return labels


@dataclass(frozen=True)
class Pushed:
    """What ``push`` made: the project and which task holds which sub-tile."""

    url: str
    project: int
    tasks: dict[int, str]

    @property
    def project_url(self) -> str:
        return f"{self.url}/projects/{self.project}/data"


def push(
    folder: ReviewFolder,
    client: LabelStudio,
    title: str | None = None,
    top: int | None = None,
    progress: ProgressFn | None = None,
) -> Pushed:
    """A new project with the review's ``top`` most unsure sub-tiles as tasks, each with
    the model's mask as a pre-annotation (scored 1 - unsure); recorded in
    ``labelstudio.json``."""
    tiles = folder.tiles[:top]
    if not tiles:
        raise InvalidInputError(f"the review {folder.root} holds no sub-tiles")
    project = client.create_project(
        title or f"KappaMask review: {folder.root.name}"[:50], label_config(), instructions()
    )
    tasks = []
    for number, tile in enumerate(tiles, 1):
        if progress:
            progress(100 * number // len(tiles), f"uploading {tile.name}")
        tasks.append(_task(tile, client.upload(project, tile.rgb), folder.model))
    ids = client.import_tasks(project, tasks)
    if len(ids) != len(tiles):
        raise LabellingToolError(f"Label Studio made {len(ids)} tasks of {len(tiles)} sub-tiles")
    pushed = Pushed(client.url, project, {i: t.name for i, t in zip(ids, tiles, strict=True)})
    (folder.root / RECORD_FILE).write_text(
        json.dumps({"url": pushed.url, "project": project, "tasks": pushed.tasks}, indent=2)
    )
    return pushed


def _task(tile: ReviewedTile, image_url: str, model: str) -> dict[str, Any]:
    data = {
        IMAGE: image_url,
        "title": f"#{tile.rank} {tile.name} (unsure {tile.unsure:.3f})",
        SUB_TILE_KEY: tile.name,
    }
    prediction = {
        "model_version": model or "kappamask",
        "score": round(1.0 - tile.unsure, 4),
        "result": brush_results(tile.read_mask()),
    }
    return {"data": data, "predictions": [prediction]}


def recorded_project(folder: ReviewFolder) -> tuple[str, int]:
    """(server URL, project id) that ``push`` recorded in the review folder."""
    try:
        record = json.loads((folder.root / RECORD_FILE).read_text())
        return str(record["url"]), int(record["project"])
    except FileNotFoundError:
        raise InvalidInputError(
            f"{folder.root} was never pushed to Label Studio (no {RECORD_FILE}): give --project"
        ) from None


def pull(folder: ReviewFolder, client: LabelStudio, project: int) -> list[Path]:
    """Each annotated task's latest annotation (skipped ones left out) as its sub-tile's
    label raster; the rasters written, in rank order."""
    written = {}
    for task in client.finished_tasks(project):
        name = task.get("data", {}).get(SUB_TILE_KEY)
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if name is None or not annotations:
            continue
        latest = max(annotations, key=lambda a: (str(a.get("updated_at", "")), a["id"]))
        tile = folder.tile(str(name))
        labels = rasterise(latest.get("result", []), tile.shape)
        annotator = latest.get("completed_by")
        if isinstance(annotator, Mapping):
            annotator = annotator.get("email") or annotator.get("id")
        tags = {
            "source": "label-studio",
            "server": client.url,
            "project": str(project),
            "task": str(task["id"]),
            "annotation": str(latest["id"]),
            "annotator": str(annotator),
            "updated": str(latest.get("updated_at", "")),
        }
        written[tile.name] = folder.write_labels(tile.name, labels, tags)
        LOGGER.info("%s: labels of annotation %s", tile.name, latest["id"])
    return [written[t.name] for t in folder.tiles if t.name in written]
