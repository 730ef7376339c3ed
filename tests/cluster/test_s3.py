"""The S3 endpoint is a real HTTP server: objects, listings, multipart uploads."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest


@pytest.fixture
def bucket(s3):
    name = f"test-{uuid.uuid4().hex[:10]}"
    s3.client.create_bucket(Bucket=name)
    return name


def test_endpoint_is_loopback_http(s3):
    assert s3.endpoint_url.startswith("http://127.0.0.1:")


def test_put_get_list(s3, bucket):
    client = s3.client
    client.put_object(Bucket=bucket, Key="data/a.jsonl", Body=b'{"text": "a"}\n')
    client.put_object(Bucket=bucket, Key="data/b.jsonl", Body=b'{"text": "b"}\n')
    client.put_object(Bucket=bucket, Key="other/c.txt", Body=b"c")

    assert client.get_object(Bucket=bucket, Key="data/a.jsonl")["Body"].read() == b'{"text": "a"}\n'
    listed = client.list_objects_v2(Bucket=bucket, Prefix="data/")
    assert [o["Key"] for o in listed["Contents"]] == ["data/a.jsonl", "data/b.jsonl"]
    folders = client.list_objects_v2(Bucket=bucket, Delimiter="/")["CommonPrefixes"]
    assert [p["Prefix"] for p in folders] == ["data/", "other/"]
    # A second client (as another process would have) sees the same store.
    assert s3.new_client().head_object(Bucket=bucket, Key="other/c.txt")["ContentLength"] == 1


def test_multipart_object_exists_only_after_complete(s3, bucket):
    client = s3.client
    part_size = 5 * 1024 * 1024  # S3's minimum for every part but the last
    parts_data = [os.urandom(part_size), os.urandom(1234)]
    upload = client.create_multipart_upload(Bucket=bucket, Key="model/weights.safetensors")
    parts = []
    for number, data in enumerate(parts_data, start=1):
        etag = client.upload_part(
            Bucket=bucket, Key="model/weights.safetensors", UploadId=upload["UploadId"], PartNumber=number, Body=data
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})

    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="model/")
    client.complete_multipart_upload(
        Bucket=bucket, Key="model/weights.safetensors", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    body = client.get_object(Bucket=bucket, Key="model/weights.safetensors")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(parts_data)).digest()
