"""Products in and results to a real S3-compatible server (moto in server mode)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pystac.validation import JsonSchemaSTACValidator

from kappamask.access import AccessPolicy
from kappamask.errors import AccessDeniedError, ProductNotFoundError
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import run
from kappamask.settings import Settings
from kappamask.storage.s3 import S3Settings
from kappamask.storage.sinks import OutputTarget

from .conftest import S3_SECRET, T29UNU, S3Server, check_result

SAFE_URL = f"s3://products/s2/{T29UNU.name}"
ZIP_URL = f"s3://products/zips/{T29UNU.stem}.zip"
OPTIONS = RunOptions(resolution=60)


@pytest.fixture
def client(triton: LocalTriton) -> Iterator[TritonClient]:
    with TritonClient(triton.http_url) as c:
        yield c


@pytest.fixture
def policy(s3_server: S3Server) -> AccessPolicy:
    return AccessPolicy(s3=s3_server.settings)


def _download(s3: S3Server, url: str, folder: Path) -> Path:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / key.rsplit("/", 1)[-1]
    s3.client().download_file(bucket, key, str(target))
    return target


def _check_published(
    s3: S3Server, result_item: str, tmp: Path, validator: JsonSchemaSTACValidator
) -> dict[str, object]:
    item = json.loads(_download(s3, result_item, tmp).read_text())
    for asset in item["assets"].values():
        assert asset["href"].startswith("s3://results/")
        _download(s3, asset["href"], tmp)
    assert item["links"][-1]["rel"] == "self" and item["links"][-1]["href"] == result_item
    return check_result(tmp / result_item.rsplit("/", 1)[-1], T29UNU, 60, validator)


@pytest.mark.parametrize("url", [SAFE_URL, ZIP_URL], ids=["safe-folder", "zip"])
def test_s3_product_to_s3_output(
    s3_server: S3Server,
    client: TritonClient,
    policy: AccessPolicy,
    tmp_path: Path,
    stac_validator: JsonSchemaSTACValidator,
    url: str,
) -> None:
    prefix = f"masks/{'zip' if url.endswith('.zip') else 'safe'}"
    result = run(url, OutputTarget(f"s3://results/{prefix}", policy), client, OPTIONS)
    assert result.item.startswith(f"s3://results/{prefix}/") and not result.reused
    keys = s3_server.keys("results", prefix)
    hrefs = result.files.values()
    assert [k.rsplit("/", 1)[-1] for k in keys] == sorted(Path(h).name for h in hrefs)
    _check_published(s3_server, result.item, tmp_path, stac_validator)


def test_idempotent_rerun_and_overwrite(
    s3_server: S3Server, client: TritonClient, policy: AccessPolicy
) -> None:
    out = "s3://results/idempotent"
    first = run(SAFE_URL, OutputTarget(out, policy), client, OPTIONS)
    s3 = s3_server.client()
    stamps = {
        k: s3.head_object(Bucket="results", Key=k)["LastModified"]
        for k in s3_server.keys("results", "idempotent/")
    }
    again = run(SAFE_URL, OutputTarget(out, policy), client, OPTIONS)
    assert again.reused and again.crops_inferred == 0
    assert again.statistics == first.statistics and again.item == first.item
    assert {k: s3.head_object(Bucket="results", Key=k)["LastModified"] for k in stamps} == stamps
    # other parameters are another result; overwrite computes again
    bilinear = run(SAFE_URL, OutputTarget(out, policy), client, RunOptions(60, "bilinear"))
    assert not bilinear.reused
    forced = run(
        SAFE_URL, OutputTarget(out, policy), client, RunOptions(60, "bilinear", overwrite=True)
    )
    assert not forced.reused and forced.crops_inferred == bilinear.crops_inferred


def test_missing_key_unknown_bucket_and_denied_access(
    s3_server: S3Server, client: TritonClient, policy: AccessPolicy
) -> None:
    with pytest.raises(ProductNotFoundError, match="no such key"):
        run("s3://products/s2/nope.SAFE", OutputTarget("s3://results/x", policy), client, OPTIONS)
    with pytest.raises(ProductNotFoundError, match="no such key"):
        run("s3://products/zips/nope.zip", OutputTarget("s3://results/x", policy), client, OPTIONS)
    with pytest.raises(ProductNotFoundError, match="bucket does not exist"):
        run("s3://no-such-bucket/a.SAFE", OutputTarget("s3://results/x", policy), client, OPTIONS)
    with pytest.raises(ProductNotFoundError, match="bucket does not exist"):
        run(SAFE_URL, OutputTarget("s3://no-such-bucket/out", policy), client, OPTIONS)
    # a bucket policy denies reading one prefix; anonymous requests are denied everywhere
    s3_server.upload_tree(T29UNU, "products", f"private/{T29UNU.name}")
    with (
        s3_server.denied("products", "s3:GetObject", "private/*"),
        pytest.raises(AccessDeniedError, match="access denied"),
    ):
        run(
            f"s3://products/private/{T29UNU.name}",
            OutputTarget("s3://results/x", policy),
            client,
            OPTIONS,
        )
    anonymous = AccessPolicy(
        s3=S3Settings(endpoint_url=s3_server.endpoint, anonymous=True, region="us-east-1")
    )
    with pytest.raises(AccessDeniedError):
        run(SAFE_URL, OutputTarget("s3://results/x", anonymous), client, OPTIONS)
    assert s3_server.keys("results", "x/") == []


def test_failed_upload_leaves_no_final_object(
    s3_server: S3Server, client: TritonClient, policy: AccessPolicy
) -> None:
    """Writing the STAC item is denied: the COGs already copied to their final keys and
    every staging key are removed, so the output holds nothing."""
    denied = r"publishing .*_KAPPAMASK\.json: access denied"
    with (
        s3_server.denied("results", "s3:PutObject", "denied/S2*_KAPPAMASK.json"),
        pytest.raises(AccessDeniedError, match=denied),
    ):
        run(SAFE_URL, OutputTarget("s3://results/denied", policy), client, OPTIONS)
    assert s3_server.keys("results", "denied/") == []


def test_credentials_are_never_printed(policy: AccessPolicy) -> None:
    assert S3_SECRET not in repr(policy)
    assert S3_SECRET not in repr(policy.s3) and S3_SECRET not in str(policy.s3.gdal_options())


def test_multipart_upload_and_https_hrefs(
    s3_server: S3Server,
    client: TritonClient,
    tmp_path: Path,
    stac_validator: JsonSchemaSTACValidator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every file goes up (and is copied) in multipart when it is above the threshold; a
    public URL template makes the STAC hrefs https."""
    from boto3.s3.transfer import TransferConfig

    from kappamask.storage import sinks as storage

    monkeypatch.setattr(
        storage, "TRANSFER", TransferConfig(multipart_threshold=1, multipart_chunksize=5 * 2**20)
    )
    public = f"{s3_server.endpoint}/{{bucket}}/{{key}}"
    settings = Settings.from_env({**s3_server.env, "KAPPAMASK_S3_PUBLIC_URL": public}).s3()
    target = OutputTarget("s3://results/multipart", AccessPolicy(s3=settings))
    result = run(SAFE_URL, target, client, OPTIONS)
    s3 = s3_server.client()
    for key in s3_server.keys("results", "multipart/"):
        assert s3.head_object(Bucket="results", Key=key)["ETag"].endswith('-1"'), key
    item = json.loads(_download(s3_server, result.item, tmp_path).read_text())
    for asset in item["assets"].values():
        assert asset["href"].startswith(f"{s3_server.endpoint}/results/multipart/")
        # the https href really serves the object
        assert requests.get(asset["href"], timeout=10).content == (
            _download(
                s3_server, "s3://results/multipart/" + asset["href"].rsplit("/", 1)[1], tmp_path
            ).read_bytes()
        )
    self_link = next(link for link in item["links"] if link["rel"] == "self")
    assert self_link["href"] == f"{s3_server.endpoint}/results/multipart/" + Path(result.item).name
    check_result(tmp_path / Path(result.item).name, T29UNU, 60, stac_validator)
