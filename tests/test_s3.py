"""Products in and results to a real S3-compatible server (moto in server mode)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pystac.validation import JsonSchemaSTACValidator

from kappamask.access import AccessPolicy
from kappamask.errors import AccessDeniedError, ProductNotFoundError
from kappamask.inference.server import LocalTriton
from kappamask.inference.triton import TritonClient
from kappamask.pipeline import RunOptions, run
from kappamask.s3 import S3Settings
from kappamask.storage import STAGING_PREFIX

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
    result = run(url, f"s3://results/{prefix}", client, OPTIONS, policy=policy)
    assert result.item.startswith(f"s3://results/{prefix}/") and not result.reused
    keys = s3_server.keys("results", prefix)
    assert [k.rsplit("/", 1)[-1] for k in keys] == sorted(
        Path(h).name for h in (result.mask, result.confidence, result.preview, result.item)
    )
    _check_published(s3_server, result.item, tmp_path, stac_validator)


def test_idempotent_rerun_and_overwrite(
    s3_server: S3Server, client: TritonClient, policy: AccessPolicy
) -> None:
    out = "s3://results/idempotent"
    first = run(SAFE_URL, out, client, OPTIONS, policy=policy)
    s3 = s3_server.client()
    stamps = {
        k: s3.head_object(Bucket="results", Key=k)["LastModified"]
        for k in s3_server.keys("results", "idempotent/")
    }
    again = run(SAFE_URL, out, client, OPTIONS, policy=policy)
    assert again.reused and again.crops_inferred == 0
    assert again.statistics == first.statistics and again.item == first.item
    assert {k: s3.head_object(Bucket="results", Key=k)["LastModified"] for k in stamps} == stamps
    # other parameters are another result; overwrite computes again
    bilinear = run(SAFE_URL, out, client, RunOptions(60, "bilinear"), policy=policy)
    assert not bilinear.reused
    forced = run(SAFE_URL, out, client, RunOptions(60, "bilinear", overwrite=True), policy=policy)
    assert not forced.reused and forced.crops_inferred == bilinear.crops_inferred


def test_missing_key_unknown_bucket_and_denied_access(
    s3_server: S3Server, client: TritonClient, policy: AccessPolicy
) -> None:
    with pytest.raises(ProductNotFoundError, match="no such key"):
        run("s3://products/s2/nope.SAFE", "s3://results/x", client, OPTIONS, policy=policy)
    with pytest.raises(ProductNotFoundError, match="no such key"):
        run("s3://products/zips/nope.zip", "s3://results/x", client, OPTIONS, policy=policy)
    with pytest.raises(ProductNotFoundError, match="bucket does not exist"):
        run("s3://no-such-bucket/a.SAFE", "s3://results/x", client, OPTIONS, policy=policy)
    with pytest.raises(ProductNotFoundError, match="bucket does not exist"):
        run(SAFE_URL, "s3://no-such-bucket/out", client, OPTIONS, policy=policy)
    # a bucket policy denies reading one prefix; anonymous requests are denied everywhere
    s3 = s3_server.client()
    s3_server.upload_tree(T29UNU, "products", f"private/{T29UNU.name}")
    s3.put_bucket_policy(
        Bucket="products",
        Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                           "Resource": ["arn:aws:s3:::products/private/*"]}],
        }),
    )  # fmt: skip
    try:
        with pytest.raises(AccessDeniedError, match="access denied"):
            run(f"s3://products/private/{T29UNU.name}", "s3://results/x", client, OPTIONS,
                policy=policy)  # fmt: skip
    finally:
        s3.delete_bucket_policy(Bucket="products")
    anonymous = AccessPolicy(
        s3=S3Settings(endpoint_url=s3_server.endpoint, anonymous=True, region="us-east-1")
    )
    with pytest.raises(AccessDeniedError):
        run(SAFE_URL, "s3://results/x", client, OPTIONS, policy=anonymous)
    assert s3_server.keys("results", "x/") == []


def test_failed_upload_leaves_no_final_object(
    s3_server: S3Server, client: TritonClient, policy: AccessPolicy
) -> None:
    """Writing the STAC item is denied: the COGs already copied to their final keys and
    every staging key are removed, so the output holds nothing."""
    s3 = s3_server.client()
    s3.put_bucket_policy(
        Bucket="results",
        Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                           "Resource": ["arn:aws:s3:::results/denied/S2*_KAPPAMASK.json"]}],
        }),
    )  # fmt: skip
    try:
        with pytest.raises(
            AccessDeniedError, match=r"publishing .*_KAPPAMASK\.json: access denied"
        ):
            run(SAFE_URL, "s3://results/denied", client, OPTIONS, policy=policy)
    finally:
        s3.delete_bucket_policy(Bucket="results")
    assert s3_server.keys("results", "denied/") == []


def test_credentials_are_never_printed(policy: AccessPolicy) -> None:
    assert S3_SECRET not in repr(policy)
    assert not any(k.startswith(STAGING_PREFIX) for k in repr(policy).split())
